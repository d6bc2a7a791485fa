"""The offline pipeline, once: data → teacher → activity → catalog → plan → students → bundle →
evaluation, with one content-hash step cache and one set of settings.

* :mod:`rocoin.pipeline.config` — :class:`PipelineConfig` (what the steps read), :class:`DemoConfig`
  (``rocoin demo``'s options) and the annotated setting types both are built from;
* :mod:`rocoin.pipeline.cache` — :class:`StepCache` (reuse a step when the hash of its inputs and
  its outputs match and loading works) and :class:`CannotReuse`;
* :mod:`rocoin.pipeline.data` — the data step (find, install, download Fashion-MNIST, or digits);
* :mod:`rocoin.pipeline.steps` — the steps themselves.

``rocoin.experiments`` (the demo, the paper's experiments) and ``bench/accuracy.py`` call these.
"""

from rocoin.pipeline.cache import CannotReuse, Done, StepCache, digest, file_key, step_key
from rocoin.pipeline.config import DemoConfig, PipelineConfig, parse_options
from rocoin.pipeline.data import DataChoice, resolve_dataset
from rocoin.pipeline.steps import Pipeline

__all__ = [
    "CannotReuse",
    "DataChoice",
    "DemoConfig",
    "Done",
    "Pipeline",
    "PipelineConfig",
    "StepCache",
    "digest",
    "file_key",
    "parse_options",
    "resolve_dataset",
    "step_key",
]
