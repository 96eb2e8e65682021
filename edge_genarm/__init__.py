"""edge-genarm: GenARM guided decoding on llama.cpp (see README.md).

The Python API: `edge_genarm.load(...)` (see api.py).

Layers, each importing only from its own row and those below (docs/architecture.md holds the
table that tests/test_architecture.py checks):
  cli, generate, chat, batch, serve.cli, serve.launch, models, train   commands
  api                        load(): a Model, or a ClusterModel on Ray
  cluster                    the same on Ray (the optional `cluster` extra)
  serve.app, serve.protocol  the OpenAI server's app and wire format
  model                      Model and the calls: generate, stream, generate_batch, chat
  worker, probe              the stepping thread; the one factory of the served stack
  options, generation        a Config from defaults, preset and the user's options (and the
                             click options); the stream -> result generators
  scheduler, events          requests in, events out: one batch per context per step
  policy, speculative        one decode policy per request; the proposer (drafts)
  engine                     every context, sequences, every model step
  reward, memory             the reward head and its candidates; will it fit
  registry                   model sources and presets
  config                     every option declared once: LoadConfig, RequestParams
  llama, gguf_file           llama.cpp adapter (all ctypes), GGUF headers
  guidance, sampling, penalties, text, templates, fields, errors, files
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
