"""GGUF files as mlx-lm model directories: the offline default verifier's source.

    convert.py      the library: convert a GGUF (cached, atomic), the default verifier's dir
    cache.py        where conversions live and when one is a cache hit
    atomic.py       a directory written aside and swapped in by renames
    reader.py       open a GGUF, read its metadata (`bulk_reader.py`: the fast metadata parse)
    gemma3.py       Gemma 3's GGUF tables: tensor names, config keys, llama.cpp's constants
    tokenizer.py    the tokenizer files rebuilt from the GGUF's vocabulary
    quantized.py    GGUF quantized blocks as MLX affine quantized layers, bit for bit
    cli.py          `python -m mlx_engine.convert_gguf`

Only `convert.py` and `quantized.py` touch MLX, and only when converting: the torch reference
reads GGUF targets through `reader.py` and `gemma3.py` on machines without it.
"""
