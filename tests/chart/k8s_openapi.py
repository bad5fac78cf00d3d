"""Validate Kubernetes manifests against the cluster's OpenAPI (swagger 2.0) schema, offline.

The schema is `api/openapi-spec/swagger.json` of the k8s.io/kubernetes source at the
version the kind cluster runs (conftest.py finds it in the Go module cache). Each object's
definition is found by its `x-kubernetes-group-version-kind`; `$ref`s resolve inside the
same document. Stricter than the API server's default in one way that matters for a chart:
unknown fields are errors (like `kubectl apply --validate=strict`), so a misspelt or
misplaced key fails instead of being silently dropped.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

# Types the API server accepts in more than one JSON shape.
_LOOSE = {
    # "8080" or 8080
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    # "500m", "2" or 2
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"anyOf": [{"type": "string"}, {"type": "number"}]},
}


class OpenAPI:
    def __init__(self, swagger: Path) -> None:
        doc = json.loads(swagger.read_text())
        self.definitions: dict[str, Any] = {name: _strict(d) for name, d in doc["definitions"].items()}
        self.definitions.update(copy.deepcopy(_LOOSE))
        self.by_gvk: dict[tuple[str, str, str], str] = {}
        for name, d in doc["definitions"].items():
            for gvk in d.get("x-kubernetes-group-version-kind", []):
                self.by_gvk[(gvk["group"], gvk["version"], gvk["kind"])] = name

    def add_crd(self, crd: dict[str, Any]) -> None:
        """Also validate the custom resource a CustomResourceDefinition defines (each served
        version's openAPIV3Schema; `metadata` is the standard ObjectMeta)."""
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            schema.setdefault("properties", {})["metadata"] = {
                "$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
            }
            name = f"crd.{group}.{v['name']}.{kind}"  # no '/': it is a JSON pointer
            self.definitions[name] = _strict(schema)
            self.by_gvk[(group, v["name"], kind)] = name

    def definition_for(self, api_version: str, kind: str) -> str:
        group, _, version = api_version.rpartition("/")
        try:
            return self.by_gvk[(group, version, kind)]
        except KeyError:
            raise LookupError(f"{api_version} {kind} is not a type of this Kubernetes version") from None

    @cache  # noqa: B019 - one instance per test session
    def _validator(self, definition: str) -> jsonschema.Draft4Validator:
        schema = {"$ref": f"#/definitions/{definition}", "definitions": self.definitions}
        return jsonschema.Draft4Validator(schema)

    def errors(self, obj: dict[str, Any]) -> list[str]:
        """Problems of one manifest, each naming the object and the field path; [] when valid."""
        what = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        if "apiVersion" not in obj or "kind" not in obj:
            return [f"{what}: apiVersion and kind are required"]
        try:
            definition = self.definition_for(obj["apiVersion"], obj["kind"])
        except LookupError as exc:
            return [f"{what}: {exc}"]
        found = []
        for err in self._validator(definition).iter_errors(obj):
            path = ".".join(str(p) for p in err.absolute_path) or "(root)"
            found.append(f"{what}: {path}: {err.message}")
        return found


def _strict(schema: Any) -> Any:
    """A copy in which every object with declared properties rejects undeclared ones."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if k != "properties"}
        if "properties" in schema:
            out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema
