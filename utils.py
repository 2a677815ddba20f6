"""What both entry scripts share: how a command ends on a user's mistake, and the save dir they
write to."""
import os
import sys
from contextlib import contextmanager

from jem.errors import UserError


def run_cli(main, argv=None):
    """Run an entry point; a UserError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def prepare_save_dir(save_dir, flag="--save_dir"):
    """Create the output folder and check it is writable, before any expensive work starts; `flag`
    names it in the error line."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = os.path.join(save_dir, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {flag} {save_dir} ({e.strerror}); choose a writable "
                        "folder")


@contextmanager
def save_dir_removed_on_failure(save_dir, scratch=()):
    """prepare_save_dir, then the command's work; if that fails, the folders this command created
    for --save_dir are removed again while nothing but `scratch` files (the failed attempt's log,
    say) is in them, so that a failed command leaves no empty folder behind. A folder that existed
    is kept."""
    created, folder = [], os.path.abspath(save_dir)
    while not os.path.exists(folder):  # the folders makedirs will create, save_dir first
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        prepare_save_dir(save_dir)
        yield
    except BaseException:
        remove_if_unused(created, scratch)
        raise


def remove_if_unused(folders, scratch):
    """Remove each folder in turn (the first may hold `scratch` files); stop at one holding more."""
    for i, folder in enumerate(folders):
        try:
            left = os.listdir(folder)
            if any(name not in scratch or i > 0 for name in left):
                return
            for name in left:
                os.remove(os.path.join(folder, name))
            os.rmdir(folder)
        except OSError:  # gone already, or not ours to remove: leave it
            return
