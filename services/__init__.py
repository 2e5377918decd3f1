"""audio2video stage services and the shared runtime they all use."""
