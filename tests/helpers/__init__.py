"""The suite's helpers, in one place (``tests/`` is on pytest's ``pythonpath``, pyproject.toml):

- ``suite``: the suite's settings: project root, tiny image size, where the real images are,
  the ``msld`` mark, the overrides that keep a pipeline's outputs in a temporary folder;
- ``models``: the one tiny Keras model the tests train, serve and guard;
- ``training``: a stand-in for ``train`` (a tiny model saved and logged as the contract says);
- ``serve``: a tiny champion in the test BentoML store, test uploads, a real server;
- ``browser``: Debian's chromium and chromedriver, and where screenshots go;
- ``dvc``: the pipeline's commands (git, dvc, pox) in a project copy;
- ``stage_closure``: what each DVC stage's code imports and reads.

Fixtures live in the conftest files: ``tests/conftest.py`` the session's (composed configs, one
prepared synthetic data set), ``tests/integration/conftest.py`` those of the integration tests.
"""
