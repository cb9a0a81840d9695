"""Device profiles as data: the stored form and its checks (spec.py), payload formats
(formats.py), mapping and validation rules (rules.py), and `compile.compile_profile`, which makes
one a decoder.  (This package imports nothing itself: the registry reads `spec` alone.)"""
