"""One error root; each class maps to its own CLI exit code."""

from __future__ import annotations


class QBuildError(Exception):
    """A known failure: printed without a traceback, exits with ``exit_code``."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ManifestError(QBuildError):
    """Bad manifest, override or group option; names the key path."""

    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.key = key


class PlanError(QBuildError):
    """The plan cannot be made: missing model source, unreadable weights."""

    exit_code = 3


class StageError(QBuildError):
    """A stage failed while running; nothing of it was published."""

    exit_code = 4
    stage = "stage"


class LoadError(StageError):
    stage = "load"


class TransformError(StageError):
    stage = "transform"


class ExportError(StageError):
    exit_code = 5
    stage = "export"


class CompileError(StageError):
    """Compilation failed; carries the command, exit code and output tail when a tool ran."""

    exit_code = 6
    stage = "compile"

    def __init__(
        self,
        message: str,
        *,
        command: list[str] | None = None,
        returncode: int | None = None,
        output_tail: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.command = command
        self.returncode = returncode
        self.output_tail = output_tail

    def __str__(self) -> str:
        parts = [self.message]
        if self.command:
            parts.append("  command: " + " ".join(self.command))
        if self.returncode is not None:
            parts.append(f"  exit code: {self.returncode}")
        if self.output_tail:
            parts.append("  output (tail):\n" + "\n".join("    " + ln for ln in self.output_tail.splitlines()))
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)


class VerifyError(StageError):
    """The compiled artifact disagrees with the PyTorch reference."""

    exit_code = 7
    stage = "verify"


class CacheError(QBuildError):
    """The cache cannot be read or written."""

    exit_code = 8


class CacheMiss(CacheError):
    """``--cache=readonly``: a stage is not in the cache (names the stage and why it would be built)."""

    exit_code = 10


class NotReproducible(QBuildError):
    """``--cache=redo``: a rebuilt stage's output differs from the cached one."""

    exit_code = 11


class BundleError(QBuildError):
    """A bundle (``--out``) does not match its provenance, or cannot be written."""

    exit_code = 12


class RunError(QBuildError):
    """Running a built artifact failed: a prompt too long for the context, an unusable input."""

    exit_code = 9


class CannotExecute(RunError):
    """This machine cannot run the artifact of this backend (its runtime is missing here)."""


EXIT_INTERRUPTED = 130


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception (with the next line when the first ends in a colon), at most
    300 characters: the cause inside a qbuild error message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else "".join(lines[:1])
    return f"{type(exc).__name__}: {text}"[:300]
