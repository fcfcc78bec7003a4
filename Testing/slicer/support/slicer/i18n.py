"""Stand-in for Slicer's slicer/i18n.py: in the application these look the text up in the loaded translation."""


def tr(text):
    return text


def translate(context, text):
    return text
