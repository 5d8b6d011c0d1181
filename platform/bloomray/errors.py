"""The one base class of bloomray's own errors, and the exit code of each kind.

Every error bloomray raises on purpose derives from :class:`BloomrayError` and says, in its
message, what is wrong and what to do instead. ``bloomray <verb>`` prints such an error as one
line (``bloomray: error: <message>``; the traceback too with ``-v``) and exits with its
:attr:`~BloomrayError.exit_code`; anything else is a bug and gets a full traceback and exit 1.

The kinds (each class also keeps its old builtin base, so ``except ValueError`` still works):

==========================  ====  ==========================================================
class (module)              exit  raised when
==========================  ====  ==========================================================
ConfigError (config)        2     a config key, value, combination, preset, ``--resume`` dir
DataError (data.corpus)     2     a data file is missing, unreadable or has bad rows/columns
DataTooSmallError           2     fewer examples than one step needs (``train.batches``)
TokenizerError              2     the tokenizer dir/name cannot be loaded (``data.tokenizer``)
ModelLoadError              2     ``model.path`` / a model dir cannot be loaded (``model.build``)
CorruptCheckpointError      2     a checkpoint dir is not one, or is incomplete/damaged
QuantizeError               2     the model dir cannot be quantized as asked (``serving.quantize``)
TrainingError (train.run)   1     training (or every trial of a search) failed after retries
ExportError                 1     the export failed: target exists, shapes or logits mismatch
DegenerateCompletionError   1     ``bloomray demo``: a served completion repeats one token (``demo``)
==========================  ====  ==========================================================

This module is at the bottom of the package: it imports nothing from bloomray.
"""

from __future__ import annotations

#: The user's input is wrong (config, data, tokenizer, model path, checkpoint path): fix it, rerun.
EXIT_USAGE = 2
#: The work itself failed (training, export): see the message and the logs it names.
EXIT_FAILED = 1


class BloomrayError(Exception):
    """An expected failure, with a message for the person who ran bloomray.

    Attributes:
        exit_code: what ``bloomray <verb>`` exits with (``EXIT_USAGE`` 2 for bad input,
            ``EXIT_FAILED`` 1 for work that failed); set per subclass.
        hint: optional extra advice, printed after the message.
    """

    exit_code: int = EXIT_FAILED
    hint: str | None = None

    def __init__(self, *args: object, hint: str | None = None) -> None:
        super().__init__(*args)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{msg} ({self.hint})" if self.hint else msg
