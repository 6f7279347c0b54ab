"""The terminal UI's screens, one module (and one stylesheet) per screen."""
