"""User-facing errors: the base class of the core's own, and readable messages for any exception."""

OOM_ADVICE = (
    "Training ran out of memory. Try a smaller batch size, a shorter max length (prompt + response), "
    "or shorter responses (max_new_tokens for PPO); lowering the LoRA rank helps a little too. "
    "The run stopped; its last checkpoint is intact, so you can resume it after changing nothing, "
    "or start a new run from that checkpoint with smaller settings."
)

# Errors the core raises for people already carry a sentence for them (names, not classes, so this
# module imports nothing heavy).
USER_ERRORS = {"StudioError", "ConfigError", "ModelLoadError", "ProjectError", "DataImportError", "RewardError"}


class StudioError(Exception):
    """The base of every error whose message is meant for the user (the CLI prints it, the GUI shows it)."""


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def describe_error(exc: BaseException) -> str:
    """A readable message for an exception, with a suggestion where one is known."""
    if is_out_of_memory(exc):
        return f"{OOM_ADVICE}\n\n({type(exc).__name__}: {_first_line(exc)})"
    if {cls.__name__ for cls in type(exc).__mro__} & USER_ERRORS:
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"A file is missing: {exc.filename or exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "The run was interrupted."
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
