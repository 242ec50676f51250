"""Optional glue to other libraries; each module imports its library lazily."""
