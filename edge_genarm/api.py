"""The Python API: load the models once, then generate from any thread.

    import edge_genarm

    with edge_genarm.load("demo") as model:                 # a preset, or base=/arms= paths
        result = model.generate("Tell me about rain.", arms={"positive": 1.5}, max_tokens=64)
        print(result.text, result.finish_reason, result.usage.completion_tokens)
        for chunk in model.stream("Hi!", temperature=0.7):
            print(chunk.text, end="", flush=True)
        results = model.generate_batch(["Hi!", {"prompt": "Hello", "arms": {"positive": 0}}])
        for done in model.as_completed(["Hi!", "Hello"]):      # as each finishes
            print(done.index, done.error or done.results[0].text)
        reply = model.chat([{"role": "user", "content": "Hi!"}])
        cold = RequestParams(sampling=SamplingSettings(temperature=0.2), max_tokens=32)
        model.generate("Hi!", cold)                             # a whole set of settings

Contract:
- `load(preset=None, **options)` takes every declared option by name (`LoadConfig`'s: `base`,
  `arms`, `alphas`, `ctx_size`, `n_gpu_layers`, `parallel`, ...; and `RequestParams`' as the
  defaults of every call: `temperature`, `max_tokens`, `system`, ...) over the preset's, and
  checks them (`UserError`, one line naming the option). `arms` is a list of "PATH[:ALPHA]"
  (or a dict PATH -> ALPHA, or `ArmRef`s), `alphas` a dict NAME -> weight. Environment
  variables are not read (a program says what it wants); models.toml files are merged as for
  the commands. `ray=True` (or a Ray address) loads it on `workers` actors of a Ray cluster
  instead (one per node by default; the `cluster` extra): a `ClusterModel` with the same calls.
- The calls (`model.Calls`): `generate`, `stream`, `generate_batch`, `as_completed`, `chat`,
  each taking a `RequestParams` and/or request options by name; see model.py.
"""

from __future__ import annotations

from . import fields
from .config import ArmRef, Config, LoadConfig, RequestParams
from .errors import EngineError, UserError
from .generation import Result
from .model import Calls, Chunk, Completion, Model
from .options import configure
from .sampling import SamplingSettings

__all__ = ["load", "Model", "Calls", "Result", "Chunk", "Completion", "Config", "LoadConfig",
           "RequestParams", "SamplingSettings", "ArmRef", "UserError", "EngineError"]


def load(preset: str | None = None, *, ray: bool | str | None = None,
         workers: int | None = None, **options) -> Calls:
    """Load a preset (or base= and arms=) with these options; see the module docstring and
    the options below."""
    config = configure(preset, options)
    if ray is None or ray is False:
        if workers is not None:
            raise UserError("workers= spreads the model over a Ray cluster: add ray=True (or "
                            "a Ray address)", "workers")
        return Model(config)
    from .cluster import ClusterSpec
    from .cluster.batch import ClusterModel
    address = None if ray is True else str(ray)
    return ClusterModel(ClusterSpec(address, workers, config))


def _options_doc(classes, title: str) -> str:
    """The declared options as help() shows them (generated, never written beside them)."""
    lines = [f"\n{title}\n"]
    for cls in classes:
        for spec in fields.specs(cls):
            default = spec.option.show or repr(spec.default)
            lines.append(f"    {spec.name} ({fields.kind(spec)}, default {default}): "
                         f"{spec.option.help}")
    return "\n".join(lines) + "\n"


load.__doc__ += _options_doc((LoadConfig, RequestParams), "Options:")
for _call in (Calls.generate, Calls.generate_batch, Calls.chat, Model.stream,
              Model.as_completed, Model.generate_batch):
    _call.__doc__ = (_call.__doc__ or "") + _options_doc((RequestParams,), "Request options:")
