"""The GCS emulator of tests/test_storage.py: gcp-storage-emulator, run as its own command
would (`python tests/gcs_emulator.py start --port=...`), with one header added.

Real GCS sends an object's generation (`x-goog-generation`) with its bytes. TensorStore's GCS
driver reads it to make its conditional writes (orbax's OCDBT manifest is read, then
rewritten only if unchanged), and the emulator leaves it out: without it TensorStore fails
with "Malformed StorageGeneration" at the second array of a checkpoint.
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status.value < 300:
    found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(found["generation"])
    response["x-goog-metageneration"] = str(found.get("metageneration", "1"))


objects.download = download  # What objects.get calls for ?alt=media.
for _, handlers in server.HANDLERS:
  for method, handler in list(handlers.items()):
    if handler is _download:
      handlers[method] = download

if __name__ == "__main__":
  main(sys.argv[1:])
