"""Reading radiographs and labelled sets, and writing results: images, DICOM, labelmaps, DICOM-SEG, atomic files."""
