"""Namespace, dtype and axis helpers; the only place that imports array-api-compat."""
