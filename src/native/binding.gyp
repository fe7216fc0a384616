{
  "targets": [
    {
      "target_name": "qcow2_native",
      "sources": ["qcow2_native.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-O3", "-Wall", "-Wextra"]
    }
  ]
}
