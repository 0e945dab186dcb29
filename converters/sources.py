"""Open any supported source as a validated *plan*: for every canonical tensor, the rule that makes it.

A plan is checked before anything is read or written: every expected canonical tensor has its source
tensors, with the shapes the config implies and a floating dtype; every source tensor is used or a
known extra (reported). Any problem raises ``ConversionError`` with one line naming the source and
the tensors. ``load_weights`` and all converters go through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sd3ref import config as cfgmod
from sd3ref.config import ConfigError, SD3Config

from . import canonical, diffusers_layout, keras_layout, sai_layout
from .tensors import FLOAT_DTYPES, FormatError, H5Weights, SafetensorsFile, TensorInfo, dtype_name, nbytes


class ConversionError(ValueError):
    """Why a source cannot be converted; the message is one line and names the file."""


@dataclass
class Catalog:
    """Source tensors by name, each with its info and the reader that holds it."""
    tensors: dict = field(default_factory=dict)  # name -> (TensorInfo, reader, name in reader)

    def add(self, name: str, info: TensorInfo, reader, key: str):
        if name in self.tensors:
            raise ConversionError(f"{info.file}: tensor {name} also in {self.tensors[name][0].file}")
        self.tensors[name] = (info, reader, key)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][0]

    def read(self, name: str) -> np.ndarray:
        _, reader, key = self.tensors[name]
        return reader.read(key)


@dataclass
class Plan:
    source: str
    format: str
    config: SD3Config
    catalog: Catalog
    rules: dict  # canonical name -> Rule, in canonical order
    shapes: dict  # canonical name -> shape
    dropped: dict  # source name -> why it is not converted

    def dtype(self, name: str) -> np.dtype:
        return self.catalog.info(self.rules[name].sources[0]).dtype

    def read(self, name: str) -> np.ndarray:
        """One canonical tensor in its stored dtype (bfloat16 / float8 undecoded)."""
        rule = self.rules[name]
        return rule.op.to_canonical([self.catalog.read(s) for s in rule.sources])

    def components(self) -> list[str]:
        return canonical.present_components(self.config)

    def files(self) -> set:
        """The paths the plan reads: its source and every file holding one of its tensors."""
        return {self.source} | {info.file for info, _, _ in self.catalog.tensors.values()}

    def nbytes(self) -> int:
        """Bytes of the canonical tensors in their stored dtypes."""
        return sum(nbytes(shape, self.dtype(n)) for n, shape in self.shapes.items())


def _short(items: list, limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(str(i) for i in items[:limit]) + more


def make_plan(source: str, fmt: str, cfg: SD3Config, catalog: Catalog, layout, extras) -> Plan:
    """Validate ``catalog`` against the layout's rules for every component the config holds.
    ``extras(name)`` gives why a leftover source tensor may be dropped, or None."""
    shapes = canonical.expected_shapes(cfg)
    missing, misshapen, bad_dtype, rules, used = [], [], [], {}, set()

    def where(name):  # a tensor from a separate file (a Stability text encoder) names that file
        file = catalog.info(name).file
        return f" in {file}" if file and str(file) != str(source) else ""

    for comp in canonical.present_components(cfg):
        for rule in layout.rules(cfg, comp):
            used.update(rule.sources)
            present = [s in catalog.tensors for s in rule.sources]
            if not any(present) and rule.canonical in canonical.OPTIONAL:
                continue
            missing += [s for s, ok in zip(rule.sources, present) if not ok]
            if not all(present):
                continue
            want = rule.op.source_shapes(shapes[rule.canonical])
            for s, w in zip(rule.sources, want):
                if catalog.info(s).shape != w:
                    misshapen.append(f"{s} {list(catalog.info(s).shape)} (expected {list(w)}){where(s)}")
            dtypes = {catalog.info(s).dtype for s in rule.sources}
            if not dtypes <= set(FLOAT_DTYPES) or len(dtypes) > 1:
                bad_dtype.append(f"{rule.sources[0]} {'/'.join(sorted(dtype_name(d) for d in dtypes))}"
                                 f"{where(rule.sources[0])}")
            rules[rule.canonical] = rule
    dropped = {n: extras(n) for n in catalog.tensors if n not in used and extras(n)}
    unexpected = [n + where(n) for n in sorted(catalog.tensors) if n not in used and n not in dropped]
    problems = [f"{label}: {_short(items)}" for label, items in
                (("missing tensors", missing), ("unexpected tensors", unexpected),
                 ("wrong shape", misshapen), ("not a float dtype or mixed parts", bad_dtype)) if items]
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))
    order = sorted(rules)
    return Plan(source, fmt, cfg, catalog, {n: rules[n] for n in order}, {n: shapes[n] for n in order}, dropped)


# -- formats --------------------------------------------------------------------------------------------

def detect(path) -> str:
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file() or (p / "transformer").is_dir():
            return "diffusers"
        if (p / "config.json").is_file():
            return "keras"
        raise ConversionError(f"{p}: a folder that is neither a KerasHub preset (config.json) nor a diffusers pipeline (model_index.json)")
    if not p.exists():
        raise ConversionError(f"{p}: no such file or folder")
    with open(p, "rb") as f:
        magic = f.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        return "keras"
    if p.suffix == ".safetensors" or len(magic) == 8:
        return "safetensors"
    raise ConversionError(f"{p}: not a safetensors, Keras .weights.h5 or model folder")


def config_from_file(path) -> SD3Config:
    """A KerasHub ``config.json`` or preset folder, a diffusers folder, or an sd3ref SD3Config JSON."""
    if Path(path).is_dir():
        if detect(path) == "diffusers":
            return cfgmod.from_diffusers(path)
        path = Path(path) / "config.json"
    def build(d):
        return cfgmod.from_keras(d) if "class_name" in d or "mmdit_patch_size" in d else SD3Config.from_dict(d)

    return cfgmod.build_from_file(path, build, cfgmod._read_json(path))  # _read_json's errors name the path too


def open_keras(path, config_path=None) -> Plan:
    p, given = Path(path), config_path is not None
    if p.is_dir():
        config_path = config_path or p / "config.json"
        index = p / "model.weights.json"
        if (p / "model.weights.h5").is_file():
            files = [p / "model.weights.h5"]
        elif index.is_file():  # sharded: model_NNNNN.weights.h5 (Keras >= 3.10)
            files = [p / n for n in _weight_map_files(index)]
        else:
            raise ConversionError(f"{p}: no model.weights.h5 or model.weights.json")
    else:
        files = [p]
        config_path = config_path or p.parent / "config.json"
    if not Path(config_path).is_file():
        raise ConversionError(f"{config_path}: no such config file" if given else
                              f"{p}: no KerasHub config.json next to it (pass --config)")
    try:
        cfg = config_from_file(config_path)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    h5 = H5Weights([str(f) for f in files])
    catalog = Catalog()
    for name, info in h5.tensors.items():
        catalog.add(keras_layout.normalise_path(name), info, h5, name)
    return make_plan(str(p), "keras", cfg, catalog, keras_layout, keras_layout.KNOWN_EXTRAS.get)


def _weight_map_files(index: Path) -> list[str]:
    """The shard file names an index (``weight_map``: tensor -> file, or Keras' tensor -> [files]) refers to."""
    d = cfgmod._read_json(index)
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) for v in weight_map.values() for f in (v if isinstance(v, list) else [v])):
        raise ConfigError(f"{index}: no weight_map object of tensor names to file names")
    return sorted({f for v in weight_map.values() for f in (v if isinstance(v, list) else [v])})


def _safetensors_group(folder: Path, stem: str) -> list[Path]:
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return [folder / n for n in _weight_map_files(index)]
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    raise ConversionError(f"{folder}: no {stem}.safetensors or {stem}.safetensors.index.json")


def open_diffusers(path) -> Plan:
    p = Path(path)
    try:
        cfg = cfgmod.from_diffusers(p)
    except ConfigError as e:  # names the file
        raise ConversionError(str(e)) from None
    catalog = Catalog()
    for comp in canonical.present_components(cfg):
        sub = diffusers_layout.SUBFOLDERS[comp]
        for file in _safetensors_group(p / sub, diffusers_layout.WEIGHT_FILES[sub]):
            st = SafetensorsFile(file)
            for name, info in st.tensors.items():
                # transformers >= 5.6 saves a plain CLIPTextModel without the text_model. wrapper.
                flat = comp in ("clip_l", "clip_g") and not name.startswith(("text_model.", "text_projection"))
                catalog.add(f"{sub}/{'text_model.' + name if flat else name}", info, st, name)
    return make_plan(str(p), "diffusers", cfg, catalog, diffusers_layout, diffusers_layout.KNOWN_EXTRAS.get)


_SD3_CLIPS = {"clip_l": (768, 12), "clip_g": (1280, 32)}  # width, layers


def _refuse_swapped_clips(catalog, encoders: dict) -> None:
    """A CLIP-L file given as CLIP-G or the reverse would run — the two are concatenated, and their widths
    add up either way — with each one's activation and place wrong: a file with exactly the other SD3
    encoder's width and depth is refused."""
    for comp, other in (("clip_l", "clip_g"), ("clip_g", "clip_l")):
        if comp not in encoders:
            continue
        embedding = canonical.PREFIX[comp] + "text_model.embeddings.token_embedding.weight"
        layers = canonical.PREFIX[comp] + "text_model.encoder.layers."
        depth = len({n[len(layers):].split(".")[0] for n in catalog.tensors if n.startswith(layers)})
        if embedding in catalog.tensors and (catalog.info(embedding).shape[1], depth) == _SD3_CLIPS[other]:
            width, depth = _SD3_CLIPS[other]
            raise ConversionError(f"{encoders[comp]}: given for {comp} but holds a {width}-wide, {depth}-layer CLIP, "
                                  f"SD3's {other}: swapped CLIP-L and CLIP-G files (--clip-l / --clip-g)?")


def open_safetensors(path, encoders: dict | None = None, config: SD3Config | None = None) -> Plan:
    """A canonical or Stability single file, plus optional separate text-encoder files
    (``encoders``: component -> path) whose keys may lack the ``text_encoders.<name>.transformer.`` prefix."""
    main = SafetensorsFile(path)
    catalog = Catalog()
    for name, info in main.tensors.items():
        catalog.add(name, info, main, name)
    for comp, file in (encoders or {}).items():
        st = SafetensorsFile(file)
        prefix = canonical.PREFIX[comp]
        for name, info in st.tensors.items():
            full = name if name.startswith("text_encoders.") else prefix + name
            if not (full.startswith(prefix) or sai_layout.known_extra(full)):
                raise ConversionError(f"{file}: tensor {name} does not belong to {comp}")
            catalog.add(full, info, st, name)
    _refuse_swapped_clips(catalog, encoders or {})
    try:
        cfg = config or cfgmod.from_metadata(main.metadata) or cfgmod.infer_from_shapes(
            {n: catalog.info(n).shape for n in catalog.tensors})
    except KeyError as e:
        raise ConversionError(f"{path}: cannot infer the config, tensor {e.args[0]} is missing") from None
    except ConfigError as e:
        raise ConversionError(f"{path}: {e}") from None
    fmt = "canonical" if main.metadata.get("sd3ref.format") == canonical.FORMAT else "sai"
    return make_plan(str(path), fmt, cfg, catalog, sai_layout, sai_layout.known_extra)


def open_source(path, config=None, encoders: dict | None = None) -> Plan:
    """Any supported source. ``config``: a config file (KerasHub .weights.h5) or SD3Config (safetensors).
    ``encoders`` (component -> path): separate Stability text-encoder files beside a single file."""
    try:
        kind = detect(path)
        if encoders and kind in ("diffusers", "keras"):
            raise FormatError(f"{path}: separate text-encoder files go with a Stability single file, not a {kind} source")
        if kind == "diffusers":
            return open_diffusers(path)
        if kind == "keras":
            return open_keras(path, config)
        if config is not None and not isinstance(config, SD3Config):
            config = config_from_file(config)
        return open_safetensors(path, encoders, config)
    except FormatError as e:
        raise ConversionError(str(e)) from None
    except ConfigError as e:
        raise ConversionError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
