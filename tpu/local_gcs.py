"""A local GCS server for a pod simulated on one machine (tpu/local_pod.py) with every path in a bucket.

  python tpu/local_gcs.py start --host=127.0.0.1 --port=9023 --in-memory --default-bucket=my-bucket
  export STORAGE_EMULATOR_HOST=http://127.0.0.1:9023     # jaxssl derives the rest (README: Buckets)

It is gcp-storage-emulator (`pip install -r requirements-test.txt`; the arguments are the emulator's own) with
three fixes. Its downloads answer with the object's `x-goog-generation` / `x-goog-metageneration` headers, as real
GCS does; and it serves `objects.move` (moveTo, which gcsfs tries first for every rename, e.g. TFDS finishing a
prepared dataset: the plain emulator answers 501 and gcsfs retries for seconds per object before copying).
tensorstore, which writes and reads orbax checkpoints, takes an object's generation from that header on every read;
against the plain emulator each checkpoint read (and the rewrite of an OCDBT manifest within a save) fails with
"Malformed StorageGeneration", so a run could save its first checkpoint but never resume. jaxssl's jobs check a
local server for the header when they start and stop with one line naming this script if it lacks it.
And multipart uploads keep their bytes: the emulator reads them with Python's email parser, whose removal of the line
break before the closing boundary also takes a CR that ends the content (gcsfs breaks its parts with LF), so an
object whose last byte was CR lost it: a TensorBoard event file appended in such a piece was unreadable after it.
"""
import base64
import email.message
import email.parser
import json
import sys
from http import HTTPStatus


def multipart_related(body: bytes, content_type: str) -> dict | None:
  """A multipart/related upload (JSON metadata, then the content) split byte-exactly, or None if it is not one.

  The delimiter is the line break that the body's first line ends with (CRLF by RFC 2046, LF from gcsfs), then
  `--BOUNDARY`; the content runs to the closing delimiter, whatever bytes it holds.
  """
  header = email.message.Message()
  header['Content-Type'] = content_type
  boundary = header.get_param('boundary')
  first = f'--{boundary}'.encode()
  if not boundary or not body.startswith(first):
    return None
  eol = b'\r\n' if body[len(first):len(first) + 2] == b'\r\n' else b'\n'
  rest = body[len(first) + len(eol):]
  meta_part, _, rest = rest.partition(eol + first + eol)
  end = rest.rfind(eol + first + b'--')
  if not rest or end < 0:
    return None
  parts = []
  for part in (meta_part, rest[:end]):
    head, _, data = part.partition(eol + eol)
    parts.append((email.parser.BytesHeaderParser().parsebytes(head), data))
  (_, meta), (fields, content) = parts
  if fields.get('Content-Transfer-Encoding', '').lower() == 'base64':
    content = base64.b64decode(content)
  return {'meta': json.loads(meta), 'content': content, 'content-type': fields.get_content_type()}


def serve(argv: list[str]) -> None:
  """Runs gcp-storage-emulator's command line with `argv`, its downloads sending the generation headers.

  The emulator's route table takes `objects.download` when its server module is imported, so the handler is
  replaced before that import.
  """
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel  # a dev tool's
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel  # optional deps
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj['metageneration'])
    except NotFound:
      pass
    return download(request, response, storage, *args, **kwargs)

  def move(request, response, storage, *args, **kwargs):
    request.params['dest_bucket_name'] = request.params['bucket_name']
    objects.copy(request, response, storage, *args, **kwargs)
    if response.status == HTTPStatus.OK:
      objects.delete(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation
  from gcp_storage_emulator import server, settings  # pylint: disable=import-outside-toplevel  # after the patch
  read_data = server._read_data  # pylint: disable=protected-access

  def read_data_exactly(request_handler, query):
    content_type = request_handler.headers.get('Content-Type') or ''
    if not content_type.startswith('multipart/related'):
      return read_data(request_handler, query)
    raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)  # pylint: disable=W0212
    parsed = multipart_related(raw or b'', content_type)
    if parsed is None:
      raise ValueError(f'a multipart upload this server cannot split (Content-Type: {content_type})')
    return parsed

  server._read_data = read_data_exactly  # pylint: disable=protected-access  # looked up per request
  move_route = (rf'^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/'
                r'(?P<dest_object_id>.*[^/]+)$', {server.POST: move})
  server.HANDLERS = (move_route, *server.HANDLERS)  # read per request: before the generic object route
  from gcp_storage_emulator.__main__ import main  # pylint: disable=import-outside-toplevel  # after the patch
  main(argv)


if __name__ == '__main__':
  try:
    import gcp_storage_emulator  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    sys.exit('error: gcp-storage-emulator is not installed: pip install -r requirements-test.txt')
  serve(sys.argv[1:])
