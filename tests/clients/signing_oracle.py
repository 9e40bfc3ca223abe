#!/usr/bin/env python3
"""Synapse's own signing code (signedjson, and Synapse's X-Matrix header parser) as the oracle
for mxcas's federation signatures. Run with Synapse's venv python; one JSON object on stdin,
one on stdout ({"ok": true, ...} or {"ok": false, "error": "..."}):

  check-keys      {"doc": <key document>, "server": "hs.example"}
                  every ed25519 key in verify_keys has signed the document (signedjson)
  check-request   {"authorization": "X-Matrix ...", "method": "GET", "uri": "/...",
                   "destination": "hs.example", "doc": <the origin's key document>}
                  the header parses as Synapse parses it and its signature verifies, the way
                  Synapse's federation Authenticator builds the signed JSON
  sign-request    {"seed": <base64>, "key_id": "a_1", "origin": ..., "destination": ...,
                   "method": ..., "uri": ...}
                  an Authorization header as Synapse's federation client writes it
"""

import json
import sys

from signedjson.key import decode_signing_key_base64, decode_verify_key_bytes
from signedjson.sign import sign_json, verify_signed_json
from unpaddedbase64 import decode_base64
from synapse.federation.transport.server._base import _parse_auth_header


def verify_keys(doc):
    keys = {}
    for name, entry in doc["verify_keys"].items():
        alg, key_id = name.split(":", 1)
        keys[name] = decode_verify_key_bytes(name, decode_base64(entry["key"]))
    return keys


def main():
    command = sys.argv[1]
    args = json.load(sys.stdin)
    if command == "check-keys":
        if not verify_keys(args["doc"]):
            return {"ok": False, "error": "no verify_keys"}
        for name, key in verify_keys(args["doc"]).items():
            verify_signed_json(args["doc"], args["server"], key)
        return {"ok": True}
    if command == "check-request":
        origin, key, sig, destination = _parse_auth_header(args["authorization"].encode())
        if destination is not None and destination != args["destination"]:
            return {"ok": False, "error": f"destination {destination!r}"}
        request = {
            "method": args["method"],
            "uri": args["uri"],
            "destination": args["destination"],
            "origin": origin,
            "signatures": {origin: {key: sig}},
        }
        verify_signed_json(request, origin, verify_keys(args["doc"])[key])
        return {"ok": True, "origin": origin, "key": key}
    if command == "sign-request":
        key = decode_signing_key_base64("ed25519", args["key_id"], args["seed"])
        request = {k: args[k] for k in ("method", "uri", "origin", "destination")}
        signed = sign_json(request, args["origin"], key)
        auth = []
        for key_name, sig in signed["signatures"][args["origin"]].items():
            auth.append('X-Matrix origin="%s",key="%s",sig="%s",destination="%s"'
                        % (args["origin"], key_name, sig, args["destination"]))
        return {"ok": True, "authorization": auth[0]}
    return {"ok": False, "error": f"unknown command {command}"}


if __name__ == "__main__":
    try:
        result = main()
    except Exception as e:  # the oracle's refusal is an answer, not a crash
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result))
