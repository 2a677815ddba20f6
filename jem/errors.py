"""The one exception of the package: a problem the user can fix, shown as one line."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, wrong checkpoint): shown as one line."""
