"""Runs `gcp-storage-emulator` (its command line: `python tests/gcs_emulator.py start --port=...`), with the
`x-goog-generation` header that real GCS sends with every object download and that the emulator omits.

TensorStore, which writes orbax's arrays, reads that header back after the conditional reads of an OCDBT manifest
(`ifGenerationNotMatch`) and fails on a download without it ("Malformed StorageGeneration"). Nothing else is
changed: the emulator still ignores the preconditions themselves, which the tests' single writer never races.
"""

import sys

from gcp_storage_emulator import exceptions
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]
  except exceptions.NotFound:
    pass
  return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # Before the server module builds its routes from it.

from gcp_storage_emulator import __main__ as emulator  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  sys.exit(emulator.main())
