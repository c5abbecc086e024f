"""``medvlm serve``: the HTTP API over the grounding agent and the segmenters (FastAPI + uvicorn).

Endpoints (all answer JSON unless a file is asked for; ``GET /openapi.json`` and ``/docs`` describe every field):

- ``GET /healthz``: ``{"status": "ok", "version", "models": {name: loaded}}`` (models load on first use).
- ``POST /v1/segment``: image + ``box`` (one ``[x0, y0, x1, y1]`` or a list) / ``points``
  (``{"positive": [[x, y]], "negative": [...]}``) -> LiteMedSAM, and/or ``text`` -> Med-VLM.
- ``POST /v1/ground``: image + ``text`` (a phrase or a question) -> the grounding agent's answer and regions.
- ``POST /v1/link-report``: image + ``report`` -> one status per sentence, with its region ids.
- ``POST /v1/reference-segment``: ``reference`` + ``reference_mask`` (PNG) or ``reference_box``, one or more
  ``target`` images, ``label`` -> the structure in every target.
- ``POST /v1/chat/completions``: OpenAI-compatible (the image as a data URL content part); the reply's
  ``choices[0].message.content`` answers and ``choices[0].message.regions`` / ``regions`` carry the regions.
  With ``"stream": true``: server-sent ``chat.completion.chunk`` events (the answer word by word in
  ``choices[0].delta.content``, then a chunk with ``finish_reason: "stop"`` and the ``regions``), then
  ``data: [DONE]``. ``GET /v1/models`` lists the model ids it accepts (OpenAI's list shape).
- ``GET /v1/results/{result_id}.json``, ``GET /v1/results/{result_id}/masks.{png,zip,nii.gz,dcm}``,
  ``GET /v1/results/{result_id}/image.png``: a result kept on the server (:mod:`medvlm.app.server.results`) for
  ``--ttl`` seconds (default 24 h); ``DELETE /v1/results/{result_id}`` deletes it and its files at once.
- ``POST /v1/jobs``, ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/results`` (JSONL), ``.../results.zip``:
  resumable batch grounding (:mod:`medvlm.app.server.jobs`).
- ``POST /v1/pacs/segment``, ``POST /v1/pacs/link-report`` (JSON), ``GET /v1/pacs/jobs/{id}``,
  ``GET /v1/pacs/jobs/{id}/files/{name}``: ``medvlm pacs segment | link-report`` as background jobs with progress,
  on the PACS URLs the server was started with (``--pacs-url``; :mod:`medvlm.app.server.pacs_jobs`).

Task endpoints take multipart/form-data (an ``image`` file part, JSON-valued fields as JSON text) or
application/json (images as base64 or data URLs). Geometry is pixels of the ORIGINAL image (x = column,
y = row); masks are row-major RLE (:mod:`medvlm.app.server.rle`). Every error is
``{"error": {"type", "message", "expected", "fix"}}`` with its HTTP status (400 malformed, 401 no or wrong API
key, 403 a PACS URL not allowed, 404 unknown id, 409 export impossible
or no PACS configured, 413 too large, 415 not an image, 422 invalid, 504 timeout).

Security: ``--api-key`` / ``MEDVLM_API_KEY`` makes every route but ``/healthz``, the web page and the API
documentation need ``Authorization: Bearer <key>`` (what OpenAI clients send as their ``api_key``); CORS is off
unless ``--cors-origin`` allows an origin; results and finished jobs are deleted after ``--ttl`` seconds.

Importing this package is cheap: FastAPI and the models load in :mod:`medvlm.app.server.app` and on first use.
"""

from medvlm.app.server.config import ServerConfig

__all__ = ["ServerConfig"]
