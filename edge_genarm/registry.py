"""Where model files come from: models.toml, its presets, and five kinds of source.

Contract: `Registry.load(extra)` merges the shipped models.toml, the user's file and an extra
file (later ones win key by key) and refuses unknown keys by name. `registry.resolve(ref)` turns
what a user typed (a path, or @NAME of a [models] entry) into an existing local path: a local
file, a file inside an installed Python package (found through its file list, not imported), a
Hugging Face Hub file fetched into the standard cache and checked against its sha256 (deleted
from the cache if it fails), or a file derived from another entry by requantizing it (made once
into the edge-genarm cache, keyed by the source file and the type), or the files of several
packages joined in order into the cache once and checked against a pinned sha256. Offline and not
cached, a missing package, or a preset naming a missing file, each say which file and what to do.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import os
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import fields
from .config import ArmRef, LoadConfig, RequestParams
from .errors import ModelFileError, UserError
from .files import staged
from .sampling import SamplingSettings

# Every key a table may hold, and the TOML types its value may have.
_TEXT, _NUMBER = (str,), (int, float)
MODEL_KEYS = {k: _TEXT for k in ("description", "path", "package", "file", "hub", "revision",
                                 "sha256", "from", "quantize")} | {"parts": (list,)}
SOURCE_KEYS = ("path", "package", "hub", "from", "parts")


def _toml_types(spec: fields.Spec) -> tuple:
    tp = spec.base_type
    return {bool: (bool,), int: (int,), float: _NUMBER, str: _TEXT}.get(
        tp, (dict,) if typing.get_origin(tp) is dict else (list,))


# A preset's options beside its models, named as the options they stand in for: every declared
# option but the models' own keys (base, arms, reward and draft models take their tables' form)
_OWN = {"models_file", "base", "arms", "ctx_size", "chat_template", "reward_model",
        "draft_model", "verbose", "parallel", "alphas", "arm_gpu_layers"}
REQUEST_KEYS = {s.name: _toml_types(s) for cls in (LoadConfig, RequestParams)
                for s in fields.specs(cls) if s.group is None and s.name not in _OWN}
PRESET_KEYS = {"description": _TEXT, "base": _TEXT, "arms": (list,), "ctx_size": (int,),
               "chat_template": _TEXT, "sampling": (dict,), "reward_model": _TEXT,
               "draft_model": _TEXT} | REQUEST_KEYS
ARM_KEYS = {"name": _TEXT, "model": _TEXT, "alpha": _NUMBER, "adapter": _TEXT,
            "n_gpu_layers": (int,)}
SAMPLING_KEYS = {s.name: _toml_types(s) for s in fields.specs(SamplingSettings)}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list",
               dict: "a table", bool: "true or false"}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str = ""
    path: str | None = None
    package: str | None = None
    file: str | None = None
    hub: str | None = None
    revision: str = "main"
    sha256: str | None = None
    source: str | None = None      # models.toml's `from`: the @model this one is derived from
    quantize: str | None = None    # ... by requantizing it to this llama.cpp type
    parts: tuple[str, ...] = ()    # "package:file" pieces, joined in order into one file

    @property
    def kind(self) -> str:
        if self.source:
            return "derived"
        if self.parts:
            return "parts"
        return "path" if self.path else "package" if self.package else "hub"


PresetArm = ArmRef  # an ARM a preset names (name, model, alpha, adapter, GPU layers)


@dataclass(frozen=True)
class Preset:
    name: str
    base: str
    arms: tuple[PresetArm, ...] = ()
    description: str = ""
    ctx_size: int | None = None
    chat_template: str | None = None
    sampling: dict = field(default_factory=dict)
    reward_model: str | None = None  # for --method pargs/args (MODEL, @NAME or MODEL+ADAPTER)
    draft_model: str | None = None   # for speculative decoding's model drafters (likewise)
    request: dict = field(default_factory=dict)  # REQUEST_KEYS: system, stop, max_tokens...


def cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "edge-genarm"


def user_file() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "edge-genarm" / "models.toml"


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"the models file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"the models file {path} is a directory; name a .toml file") from None
    except PermissionError:
        raise UserError(f"the models file {path} cannot be read: permission denied") from None
    except UnicodeDecodeError:
        raise UserError(f"the models file {path} is not UTF-8 text; it must be TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"the models file {path} is not valid TOML: {exc}") from None


def _merge(into: dict, data: dict, path: Path) -> None:
    for table in ("models", "presets"):
        entries = data.get(table) or {}
        bad = [name for name, entry in entries.items() if not isinstance(entry, dict)]
        if bad:
            raise UserError(f"the models file {path}: [{table}] must hold tables such as "
                            f"[{table}.NAME], but {bad[0]!r} is not one")
        for name, entry in entries.items():
            into.setdefault(table, {}).setdefault(name, {}).update(entry)


def _check_keys(where: str, entry, allowed: dict[str, tuple]) -> None:
    """Unknown keys and values of the wrong type are refused, naming the key."""
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a table")
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                        f"{', '.join(sorted(allowed))}")
    for key, value in entry.items():
        types = allowed[key]
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise UserError(f"{where}: {key} must be {_TYPE_NAMES[types[-1]]}, not "
                            f"{value!r}")


class Registry:
    def __init__(self, models: dict[str, ModelEntry], presets: dict[str, Preset],
                 files: list[Path]):
        self.models, self.presets, self.files = models, presets, files
        self._deriving: set[str] = set()  # derived entries being resolved, to stop cycles

    @classmethod
    def load(cls, extra: str | Path | None = None) -> "Registry":
        shipped = Path(str(importlib.resources.files("edge_genarm") / "models.toml"))
        files = [shipped] + [p for p in (user_file(),) if p.exists()]
        extra = extra or os.environ.get("EDGE_GENARM_MODELS_FILE")
        if extra:
            files.append(Path(extra).expanduser())
        merged: dict = {}
        for path in files:
            data = _read(path)
            _check_keys(str(path), data, {"models": (dict,), "presets": (dict,)})
            _merge(merged, data, path)
        return cls.from_tables(merged, files)

    @classmethod
    def from_tables(cls, data: dict, files: list[Path]) -> "Registry":
        models = {}
        for name, entry in (data.get("models") or {}).items():
            _check_keys(f"[models.{name}]", entry, MODEL_KEYS)
            if sum(k in entry for k in SOURCE_KEYS) != 1:
                raise UserError(f"[models.{name}]: give exactly one of path, package, hub, from "
                                "or parts")
            if ("package" in entry or "hub" in entry) and "file" not in entry:
                raise UserError(f"[models.{name}]: a package or hub source needs file = ...")
            if ("from" in entry) != ("quantize" in entry):
                raise UserError(f"[models.{name}]: from = \"@model\" and quantize = \"TYPE\" "
                                "go together")
            if "parts" in entry:
                _check_parts(name, entry)
            fields = {k: v for k, v in entry.items() if k not in ("from", "parts")}
            models[name] = ModelEntry(name=name, source=entry.get("from"),
                                      parts=tuple(entry.get("parts", ())), **fields)
        presets = {}
        for name, entry in (data.get("presets") or {}).items():
            _check_keys(f"[presets.{name}]", entry, PRESET_KEYS)
            _check_keys(f"[presets.{name}.sampling]", entry.get("sampling", {}), SAMPLING_KEYS)
            if "base" not in entry:
                raise UserError(f"[presets.{name}]: base = ... is missing")
            for where, key in (("", "stop"), (".sampling", "dry_sequence_breakers")):
                values = (entry.get("sampling", {}) if where else entry).get(key, [])
                if not all(isinstance(v, str) and v for v in values):
                    raise UserError(f"[presets.{name}{where}]: {key} must be a list of "
                                    f"non-empty strings, not {values!r}")
            arms = []
            for arm in entry.get("arms", []):
                _check_keys(f"[[presets.{name}.arms]]", arm, ARM_KEYS)
                if "name" not in arm or "model" not in arm:
                    raise UserError(f"[[presets.{name}.arms]]: every ARM needs name = ... and "
                                    "model = ...")
                arms.append(ArmRef(arm["model"], float(arm.get("alpha", 1.0)), arm["name"],
                                   arm.get("adapter"), arm.get("n_gpu_layers")))
            presets[name] = Preset(name=name, base=entry["base"], arms=tuple(arms),
                                   description=entry.get("description", ""),
                                   ctx_size=entry.get("ctx_size"),
                                   chat_template=entry.get("chat_template"),
                                   sampling=dict(entry.get("sampling", {})),
                                   reward_model=entry.get("reward_model"),
                                   draft_model=entry.get("draft_model"),
                                   request={k: float(entry[k]) if REQUEST_KEYS[k] is _NUMBER
                                            else entry[k] for k in REQUEST_KEYS if k in entry})
        return cls(models, presets, files)

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise UserError(f"no preset named {name!r}; the presets are "
                            f"{', '.join(sorted(self.presets))} (edge-genarm models list)")
        return self.presets[name]

    def entry(self, ref: str) -> ModelEntry | None:
        if not ref.startswith("@"):
            return None
        if ref[1:] not in self.models:
            raise ModelFileError(f"no model named {ref}; the models are "
                                 f"{', '.join('@' + m for m in sorted(self.models))}")
        return self.models[ref[1:]]

    def resolve(self, ref: str, download: bool = True) -> Path:
        """A local path for ref; Hub files are fetched unless download is False."""
        entry = self.entry(ref)
        if entry is None:
            return Path(ref).expanduser()
        if entry.kind == "path":
            path = Path(entry.path).expanduser()
            if not path.exists():
                raise ModelFileError(f"{ref} is {path}, which does not exist; create it (see the "
                                     f"README's recipes) or fix [models.{entry.name}]")
            return path
        if entry.kind == "package":
            return package_file(entry.package, entry.file)
        if entry.kind == "derived":
            return self._derived_file(entry, download)
        if entry.kind == "parts":
            return joined_file(entry, download)
        return hub_file(entry, download)

    def _derived_file(self, entry: ModelEntry, make: bool) -> Path:
        """The cached requantization of entry.source; made (atomically) if missing and `make`."""
        if entry.name in self._deriving:
            raise UserError(f"[models.{entry.name}]: from = ... leads back to @{entry.name}")
        self._deriving.add(entry.name)
        try:
            source = self.resolve(entry.source, make)
        finally:
            self._deriving.discard(entry.name)
        path = derived_path(entry, source)
        if path.exists():
            return path
        if not make:
            raise ModelFileError(f"@{entry.name} is not made yet")
        from .llama import quant_type, quantize_model  # llama.cpp only when a file is made

        try:  # before the notice: a typo should not announce work that never starts
            quant_type(entry.quantize)
        except UserError as exc:
            raise UserError(f"[models.{entry.name}]: {exc}") from None
        print(f"edge-genarm: making @{entry.name} once: {source.name} as {entry.quantize} "
              f"into {path.parent}", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged(path) as part:
            quantize_model(source, part, entry.quantize, requantize=True)
        return path

    def local_path(self, ref: str) -> Path | None:
        """The path if the file is already here (never downloads), else None."""
        try:
            path = self.resolve(ref, download=False)
        except UserError:
            return None
        return path if path.exists() else None


def derived_path(entry: ModelEntry, source: Path) -> Path:
    """Where a derived file lives: a new source file (size, time) or type gives a new name."""
    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|"
                         f"{entry.quantize.upper()}".encode()).hexdigest()[:12]
    return cache_dir() / "derived" / f"{entry.name}-{entry.quantize.upper()}-{key}.gguf"


def package_file(distribution: str, filename: str) -> Path:
    """The installed path of `filename` shipped in `distribution`."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(f"the package {distribution} is not installed; "
                             f"pip install {distribution}") from None
    for entry in dist.files or []:
        if entry.name == filename or str(entry).endswith("/" + filename):
            return Path(dist.locate_file(entry))
    # an editable install lists no package files: look inside the importable package instead
    module = distribution.replace("-", "_")
    try:
        path = Path(str(importlib.resources.files(module) / filename))
        if path.is_file():
            return path
    except ModuleNotFoundError:
        pass
    raise ModelFileError(f"the package {distribution} has no file {filename}; "
                         f"reinstall it with pip install --force-reinstall {distribution}")


def _check_parts(name: str, entry: dict) -> None:
    parts = entry["parts"]
    if not parts or not all(isinstance(p, str) and ":" in p for p in parts):
        raise UserError(f"[models.{name}]: parts = [\"package:file\", ...] lists the pieces in "
                        "order, each a file of an installed package")
    if not entry.get("sha256"):
        raise UserError(f"[models.{name}]: a source made of parts needs sha256 = ... (of the "
                        "joined file)")


def joined_path(entry: ModelEntry) -> Path:
    return cache_dir() / "joined" / f"{entry.name}-{entry.sha256.lower()[:12]}.gguf"


def joined_file(entry: ModelEntry, make: bool = True) -> Path:
    """The pieces of `entry.parts` joined once into the cache, checked against its sha256
    while they are copied; written beside and renamed, so a failure leaves no file."""
    path = joined_path(entry)
    if path.exists():
        return path
    pieces = [part.partition(":")[::2] for part in entry.parts]
    missing = [dist for dist in dict.fromkeys(d for d, _ in pieces) if not _installed(dist)]
    if missing:
        raise ModelFileError(f"@{entry.name} is made of the files of {len(pieces)} packages; "
                             f"{len(missing)} are not installed: pip install {' '.join(missing)}")
    if not make:
        raise ModelFileError(f"@{entry.name} is not joined yet")
    files = [package_file(dist, name) for dist, name in pieces]
    print(f"edge-genarm: joining @{entry.name} once from {len(files)} packages into "
          f"{path.parent}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with staged(path) as tmp:
        with open(tmp, "wb") as out:
            for piece in files:
                with open(piece, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != entry.sha256.lower():
            raise ModelFileError(
                f"@{entry.name}: the joined parts have sha256 {digest.hexdigest()}, not the "
                f"{entry.sha256} that models.toml expects; reinstall the packages with pip "
                f"install --force-reinstall {' '.join(dict.fromkeys(d for d, _ in pieces))}")
    return path


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def hub_file(entry: ModelEntry, download: bool = True) -> Path:
    """Fetch (or find in the cache) a Hub file and check its sha256 when one is given."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    cached = try_to_load_from_cache(entry.hub, entry.file, revision=entry.revision)
    if isinstance(cached, str):
        path = Path(cached)
    elif not download:
        raise ModelFileError(f"@{entry.name} is not downloaded yet")
    else:
        try:
            path = Path(hf_hub_download(entry.hub, entry.file, revision=entry.revision))
        except LocalEntryNotFoundError:
            raise ModelFileError(
                f"@{entry.name} ({entry.hub}/{entry.file}) is not in the cache and the Hub "
                "cannot be reached (offline); run `edge-genarm models pull` with a network, "
                "or unset HF_HUB_OFFLINE") from None
        except Exception as exc:  # HTTP errors, missing repos: one line, what and where
            raise ModelFileError(f"could not fetch @{entry.name} ({entry.hub}/{entry.file}): "
                                 f"{str(exc).splitlines()[0]}") from None
    if entry.sha256 and download:
        digest = sha256_of(path)
        if digest != entry.sha256.lower():
            _discard_cached(path)  # a damaged file must not pass for the model next time
            raise ModelFileError(
                f"@{entry.name} ({entry.hub}/{entry.file}) came with sha256 {digest}, not the "
                f"{entry.sha256} that models.toml expects, and was deleted; run `edge-genarm "
                f"models pull @{entry.name}` again, or fix sha256 in [models.{entry.name}] if "
                "the Hub file changed on purpose")
    return path


def _discard_cached(path: Path) -> None:
    """Remove a Hub cache entry: the snapshot's name and the blob it links to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_model(ref: str) -> Path:
    """A path for ref with the merged registry (for callers with no registry at hand)."""
    return Registry.load().resolve(ref)
