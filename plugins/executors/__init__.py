"""Built-in executors: this process (``local``) and Ray tasks (``ray``)."""
