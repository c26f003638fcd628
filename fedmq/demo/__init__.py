"""The demo: a federation of smartwatches learning shoulder exercises."""
