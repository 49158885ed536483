#!/usr/bin/env bash
# The real peers the tests run against: dcmtk, Orthanc, dicom3tools (dciodvfy), openssl for the DICOM
# TLS tests' certificates, PostgreSQL for the journal on PostgreSQL (the tests start their own
# server; the package's service is not used), HAProxy to check the scale-out load balancer's config, and
# chromium with its driver for the console's browser tests.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v Orthanc >/dev/null || need+=(orthanc orthanc-gdcm)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)  # STOW-RS/WADO-RS peer
command -v dciodvfy >/dev/null || need+=(dicom3tools)
command -v openssl >/dev/null || need+=(openssl)  # test certificates for DICOM TLS
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)  # the journal on PostgreSQL
[ -x /usr/sbin/haproxy ] || need+=(haproxy)  # `haproxy -c` on deploy/haproxy.cfg (the scale-out compose)
[ -x /usr/bin/chromium ] || need+=(chromium)  # the admin console's tests drive a headless browser
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
