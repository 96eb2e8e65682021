"""edge-genarm: GenARM guided decoding on llama.cpp (see README.md).

The Python API: `edge_genarm.load(...)` (see api.py).

Layers, each depending only on those below it:
  cli, generate, chat, serve, models, train   commands
  cluster                    the same on Ray (the optional `cluster` extra)
  api                        load(): a Model, or a ClusterModel on Ray
  model                      Model and the calls: generate, stream, generate_batch, chat
  worker                     the stepping thread: callers' requests on one scheduler
  options, generation        a Config from defaults, preset and the user's options (and the
                             click options); the stream -> result generators
  scheduler, events          requests in, events out: one batch per context per step
  policy, speculative        one decode policy per request; the proposer (drafts)
  engine                     every context, sequences, every model step
  reward, memory             the reward head and its candidates; will it fit
  registry                   model sources and presets
  config                     every option declared once: LoadConfig, RequestParams
  llama, gguf_file           llama.cpp adapter (all ctypes), GGUF headers
  guidance, sampling, penalties, text, templates, fields
                             pure NumPy maths, text, chat templates, option declarations

`edge_genarm.convert` (checkpoints to GGUF, torch as an optional extra; its source is the
repository's top-level convert/) depends on the rest; nothing else imports it except the CLI
and `train`, lazily, when they are invoked.
"""

__version__ = "0.1.0"
__all__ = ["load", "Model", "Result", "Chunk", "LoadConfig", "RequestParams", "SamplingSettings",
           "UserError", "EngineError"]


def __getattr__(name: str):
    # The API on first use: `import edge_genarm` alone loads neither llama.cpp nor NumPy.
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'edge_genarm' has no attribute {name!r}")
