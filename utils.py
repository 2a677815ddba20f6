"""What both entry scripts share: how a command ends on a user's mistake, and the save dir they write to."""
import os
import sys

from jem.errors import UserError


def run_cli(main, argv=None):
    """Run an entry point; a UserError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def prepare_save_dir(save_dir):
    """Create the save dir and check it is writable, before any expensive work starts."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = os.path.join(save_dir, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --save_dir {save_dir} ({e.strerror}); choose a writable folder")
