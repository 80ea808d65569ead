"""The Envoy external-processing (ext_proc) server: kvroute as a Gateway API Inference Extension
endpoint picker."""
