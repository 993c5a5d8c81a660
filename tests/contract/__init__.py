"""One behaviour suite per seam, run over every implementation of it, the fake included.

A behaviour of a seam (the store, the archive, the provider) is written here once, as a test that
takes the seam's fixture; the fixture is parametrised over the implementations, so each behaviour
runs on each of them (River's ``riverdrivertest.Exercise``, saq's ``TestQueue`` subclasses). A new
implementation joins by adding one parameter to its seam's fixture; a fake that differs from the
real ones fails here, not in a unit test that trusted it.

- ``test_store_contract.py``: ``any_store`` (tests/conftest.py): the fake store, SQLite, PostgreSQL.
- ``test_outbox_contract.py``: the webhook outbox, on the same ``any_store`` (the fake store is an
  outbox as ``SqlStore`` is).
- ``test_archive_contract.py``: the fake archive, a folder, S3 (moto over loopback HTTP).
- ``test_provider_contract.py``: every provider of ``providers.NAMES`` against the simulator in
  its dialect over loopback HTTP, and the scripted fake provider given the same situations.
"""
