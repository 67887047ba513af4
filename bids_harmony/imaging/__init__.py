"""Image-processing algorithms no maintained library offers as such (ground floor)."""
