#!/usr/bin/env bash
# The real DICOM peers the tests run against: dcmtk, Orthanc, dicom3tools (dciodvfy), and openssl
# for the DICOM TLS tests' certificates.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc orthanc-dicomweb orthanc-gdcm)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v openssl >/dev/null || need+=(openssl)  # test certificates for DICOM TLS
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
