"""The errors a user can cause: one base class, which every command prints as one line and exit 2;
and the warnings, one base class too.

Anything raised that is not an ``MlxUnetError`` is a bug and keeps its traceback. The subclasses
say which kind of input was wrong; they derive from ValueError too, so code that caught
ValueError before keeps working.
"""


class MlxUnetError(ValueError):
    """Input that cannot be used as given: the message says what was wrong and what to do."""


class ConfigError(MlxUnetError):
    """A config (model, scheduler, tokenizer) that is malformed or asks for what we do not implement."""


class WeightsError(MlxUnetError):
    """Weights that do not fit the model (missing, unexpected or mis-shaped tensors) or bad weight files."""


class InputError(MlxUnetError):
    """A call with arguments of the wrong shape, kind or range."""


class ConversionError(MlxUnetError):
    """A checkpoint or folder that cannot be converted as asked."""


class PipelineError(MlxUnetError):
    """A pipeline folder that cannot be used (not converted, parts missing or mismatched)."""


class MlxUnetWarning(UserWarning):
    """Something a user should know that does not stop the work (the commands print it as one
    line ``warning: ...`` on stderr, whatever the progress setting)."""


class NonFiniteWarning(MlxUnetWarning):
    """NaN or infinite values in weights or latents: the images will be black or noise."""
