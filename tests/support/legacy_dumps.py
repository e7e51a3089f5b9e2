"""The old tool's record encoder, for tests/legacy_format.rs.

Reads lines from stdin, each the base64 of one BSON document, and writes for each one line:
bson.json_util.dumps of the document, exactly as the old tool wrote a change event. Needs
pymongo 3 (run with .venv-pymongo3/bin/python, made by scripts/test-setup): pymongo 4 changed
the defaults to relaxed Extended JSON.

The decode uses pymongo 3's own defaults, which are what its change streams handed the old
tool: CodecOptions() is document_class=dict (ordered), tz_aware=False and
uuid_representation=PYTHON_LEGACY. json_util.dumps then uses its defaults too
(LEGACY_JSON_OPTIONS). A document pymongo 3 cannot decode gives the line "!ERROR <message>".
"""

import base64
import sys

import bson
import pymongo
from bson import json_util
from bson.codec_options import CodecOptions

if pymongo.version_tuple[0] != 3:
    sys.exit("legacy_dumps.py needs pymongo 3, found %s" % pymongo.version)

OPTIONS = CodecOptions()


def main():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            doc = bson.decode(base64.b64decode(line), codec_options=OPTIONS)
            out = json_util.dumps(doc)
        except Exception as exc:  # reported per document, so the other lines still compare
            out = "!ERROR %s: %s" % (type(exc).__name__, exc)
        sys.stdout.write(out + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
