"""The embedded synthetic world's tiny CLIP: training (``slugkit.world.train``) of the model shipped in ``assets/embedded``.

The world itself (identities, utility classes, rendering, shards) lives in :mod:`slugkit.data.world`.
"""
