"""The one tiny Keras model of the suite: the architecture contract in miniature."""

from __future__ import annotations

from helpers.suite import TEST_IMAGE_SIZE


def tiny_model(image_size: int = TEST_IMAGE_SIZE, n_classes: int = 2, seed: int = 0):
    """[0, 255] in, scaling inside, a convolution (for heatmaps and the guard's features), then
    P(positive) out (sigmoid) for two classes, or a softmax over ``n_classes``: outputs that
    really depend on the image, and the same weights for the same ``seed``."""
    import keras

    keras.utils.set_random_seed(seed)
    units, activation = (1, "sigmoid") if n_classes == 2 else (n_classes, "softmax")
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(units, activation=activation, name="output")(x)
    return keras.Model(inputs, outputs, name="tiny")
