"""bonedist: bone-age models for pediatric hand radiographs, trained and evaluated at cluster scale."""

__version__ = "0.1.0"


class BonedistError(Exception):
    """A user error (bad flag, bad file, bad data) that the CLI reports as one clear line, without a traceback."""
