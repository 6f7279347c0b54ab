"""The package version and the plugin API version, in the one module everything may import."""

__version__ = "0.1.0"

#: The plugin API version, MAJOR.MINOR. A plugin declares the version it was built for as
#: ``WORKBENCH_API = "2.0"`` in its module; it loads into any 2.x from 2.0 up and is refused by
#: another major version, with a message naming both. Bump MINOR for additions to the public
#: API, MAJOR for any change that can break a plugin (tests/test_public_api.py holds the surface).
API_VERSION = "2.0"
