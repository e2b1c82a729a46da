"""Where training loops log from: Lightning, Hugging Face ``transformers`` and Keras.

Each integration imports its framework lazily (``import tracklane.integrations.lightning`` needs
Lightning; this package needs nothing), sanitizes keys the server would refuse (saying once what it
renamed), and never lets a logging failure stop training.
"""
