"""Validate custom resources against the openAPIV3Schema of our CRDs.

usage: crd_schema.py CRDS.yaml FILE...

Every document in FILE... whose apiVersion is toolmesh.dev/v1alpha1 is checked
against the schema of its kind in CRDS.yaml (jsonschema, Draft 4 semantics with
OpenAPI's `nullable`), the way an API server checks an object before admitting it.
Prints one line per document; exits 1 if any fails or a kind has no CRD.
"""

import copy
import sys

import jsonschema
import yaml


def openapi_to_jsonschema(node):
    """OpenAPI v3 `nullable: true` is JSON Schema's type [t, "null"]."""
    if isinstance(node, dict):
        node = {k: openapi_to_jsonschema(v) for k, v in node.items()}
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        # Kubernetes-only keys mean nothing to jsonschema; formats like uint32 are ignored.
        return {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [openapi_to_jsonschema(v) for v in node]
    return node


def main():
    crds, files = sys.argv[1], sys.argv[2:]
    schemas = {}
    with open(crds) as f:
        for doc in yaml.safe_load_all(f):
            if not doc:
                continue
            kind = doc["spec"]["names"]["kind"]
            version = doc["spec"]["versions"][0]
            api = f'{doc["spec"]["group"]}/{version["name"]}'
            schema = openapi_to_jsonschema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            schemas[(api, kind)] = schema
    failed = 0
    checked = 0
    for path in files:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or not str(doc.get("apiVersion", "")).startswith("toolmesh.dev/"):
                    continue
                name = f'{path}: {doc.get("kind")}/{doc.get("metadata", {}).get("name")}'
                schema = schemas.get((doc["apiVersion"], doc.get("kind")))
                if schema is None:
                    print(f"FAIL {name}: no CRD for {doc['apiVersion']} {doc.get('kind')}")
                    failed += 1
                    continue
                body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
                errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(body), key=str)
                checked += 1
                if errors:
                    failed += 1
                    for e in errors:
                        where = ".".join(str(p) for p in e.absolute_path)
                        print(f"FAIL {name}: {where}: {e.message}")
                else:
                    print(f"ok {name}")
    print(f"{checked} checked, {failed} failed")
    sys.exit(1 if failed or not checked else 0)


if __name__ == "__main__":
    main()
