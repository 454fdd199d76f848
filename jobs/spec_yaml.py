"""The YAML dialect of experiment specs: safe loading, duplicate keys refused, anchors and aliases refused,
1e-12 read as a number; and reading a spec file in it, every failure a one-line SpecError."""
from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from jobs.spec_checks import SpecError

MAX_SPEC_BYTES = 1_000_000  # a spec is a page of settings; anything this large is not one


class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the changes a spec author expects (and one a shared service needs: no
    anchors or aliases, which specs have no use for and which let a few lines expand to gigabytes)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise yaml.composer.ComposerError(
                None, None, f"YAML {kind}{event.anchor} is not allowed in a spec: write each value out",
                event.start_mark)
        return super().compose_node(parent, index)


def _construct_mapping(loader: SpecLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {first + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 (PyYAML) reads 1e-12 as a string; YAML 1.2 and every user read it as a number.
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def read_spec_file(path: str | os.PathLike, specs_dir: Path) -> object:
    """The data of the spec file at `path`; a missing, unreadable, oversized or invalid file is a SpecError
    (a missing one lists the specs shipped in `specs_dir`)."""
    source = str(path)
    try:
        size = Path(path).stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError("", source, f"a spec is at most {MAX_SPEC_BYTES:,} bytes", source,
                            f"is {size:,} bytes long")
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.name for p in specs_dir.glob("*.yaml")))
        raise SpecError("", source, f"the specs shipped with fragile are in {specs_dir}: {shipped}",
                        source, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError("", source, str(e), source, "cannot be read") from None
    try:
        return yaml.load(text, Loader=SpecLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(where, None, problem, source, "invalid YAML") from None
