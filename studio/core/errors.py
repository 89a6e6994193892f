"""The base of every error whose message is meant for the user (the CLI prints it, the GUI shows it)."""


class StudioError(Exception):
    pass
