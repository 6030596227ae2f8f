"""The errors of the application layer (the `hf-efficient` command and its data code) that the user can fix: the
command prints their message as one line (`hf-efficient: error: ...`) instead of a traceback."""


class TaskError(ValueError):
    """A problem with the user's input (model, task, data, output folder)."""


class MissingDependencyError(ImportError):
    """A package a feature needs is not installed; the message names the pip command that installs it."""


def first_line(error: BaseException) -> str:
    """The first line of the root cause of an error (library errors are long chains), at most 300 characters."""
    root = error
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    text = str(root).strip() or type(root).__name__
    return text.splitlines()[0][:300]


class UsageError(Exception):
    """A command-line syntax error (exit status 2)."""
