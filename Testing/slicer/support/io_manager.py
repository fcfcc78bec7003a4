"""Stand-in for `slicer.app.coreIOManager()` with the two readers that claim a DICOM file: the Volumes module's and
the DICOM module's. Behaviour copied from Slicer v5.12.3 (the same in v5.8.1):

- Base/QTCore/qSlicerCoreIOManager.cxx:106-131: the readers of a file, highest confidence first (confidence > 0);
  :242-246 `fileType(path)` is the first one's file type, "NoFile" without one;
- :615-681 `loadNodes(fileType, properties, nodes)`: the readers of that file type that give the file a confidence
  above 0 try in turn; the first `load` that succeeds wins, and its nodes are what was loaded (none is a success);
- Base/QTCore/qSlicerFileReader.cxx:64-76: confidence 0.5 + 0.01 x the longest matched extension ("*" counts 0);
- Modules/Loadable/Volumes/qSlicerVolumesReader.cxx:98-111: "VolumeFile", with these extensions (and "*");
- Modules/Scripted/DICOM/DICOM.py:1410-1444 (v5.8.1 :956-990): "DICOMFileImport" claims every DICOM file at 0.6;
  `load` imports the file's whole folder into the DICOM database, opens the DICOM browser and loads no node.
"""

from __future__ import annotations

import os

VOLUME_EXTENSIONS = (
    ".hdr .nhdr .nrrd .mhd .mha .mnc .nii .nii.gz .mgh .mgz .mgh.gz .img .img.gz .pic .dcm .ima "
    ".png .tif .tiff .jpg .jpeg"
).split()


class VolumesReader:
    fileType = "VolumeFile"

    def confidence(self, path: str) -> float:
        if not os.path.isfile(path):
            return 0.0
        matched = [len(e) for e in VOLUME_EXTENSIONS if path.lower().endswith(e)]
        return 0.5 + 0.01 * max(matched, default=0)  # "All Files (*)" matches the rest with 0 characters

    def load(self, properties: dict) -> list:
        import slicer_app

        options = {k: v for k, v in properties.items() if k != "fileName"}
        return [slicer_app.load_volume_file(properties["fileName"], options)]


class DICOMFileReader:
    fileType = "DICOMFileImport"

    def __init__(self):
        self.importedFolders: list[str] = []

    def confidence(self, path: str) -> float:
        import pydicom

        return 0.6 if os.path.isfile(path) and pydicom.misc.is_dicom(path) else 0.0

    def load(self, properties: dict) -> list:
        import pydicom
        import slicer_app

        folder = os.path.dirname(os.path.abspath(properties["fileName"]))
        database = slicer_app.dicom_database()
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and pydicom.misc.is_dicom(path):
                database.insert(path)
        self.importedFolders.append(folder)
        return []  # the user goes on in the DICOM browser


class CoreIOManager:
    def __init__(self):
        self.readers = [VolumesReader(), DICOMFileReader()]

    def _readers(self, path: str) -> list:
        rated = [(reader.confidence(path), reader) for reader in self.readers]
        return [reader for confidence, reader in sorted(rated, key=lambda r: -r[0]) if confidence > 0]

    def fileType(self, path: str) -> str:
        readers = self._readers(path)
        return readers[0].fileType if readers else "NoFile"

    def loadNodes(self, fileType: str, properties: dict, loadedNodes=None) -> bool:
        for reader in self._readers(properties["fileName"]):
            if reader.fileType != fileType:
                continue
            try:
                nodes = reader.load(dict(properties))
            except RuntimeError:  # a failed read: the next reader tries
                continue
            for node in nodes:
                if loadedNodes is not None:
                    loadedNodes.AddItem(node)
            return True
        return False
