"""A stand-in for easyocr (torch) in tests only: OSWorld's docs metrics import it at module level,
and only compare_image_text uses it."""


class Reader:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("easyocr is stubbed in the test environment")
