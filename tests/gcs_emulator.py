"""`gcp-storage-emulator start ...` with one gap to GCS closed: the generation headers of a media download.

Real GCS answers every object download with `x-goog-generation` and `x-goog-metageneration`
(https://cloud.google.com/storage/docs/xml-api/reference-headers#xgooggeneration). The emulator (2026.7.19)
omits them, so tensorstore (Orbax's array writer) reads an object's generation as unknown, and its next
conditional write (`ifGenerationMatch`, how OCDBT commits its manifest) fails with "Malformed StorageGeneration".
Run as `python tests/gcs_emulator.py start --host=... --port=... --in-memory`; everything else is the emulator's.
"""

from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    """The emulator's download, plus the object's generation headers (as GCS sends them) when it succeeded."""
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # before `server` builds its route table from `objects.download`

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    main(sys.argv[1:])
