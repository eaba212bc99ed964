"""sgl_plugins: the pluggy hook spec and plugin manager that backends plug into."""
