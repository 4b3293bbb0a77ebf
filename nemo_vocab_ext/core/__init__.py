"""Pure core: vocabulary sizes, key tables, row-class resize and init strategies.

Nothing in this package imports NeMo or touches files: state dicts and tensors in, tensors out.
"""
