{
  "targets": [
    {
      "target_name": "vrdma_native",
      "sources": [
        "src/addon.cc",
        "src/crc32.cc",
        "src/eventfd.cc",
        "src/fd_watcher.cc",
        "src/js.cc",
        "src/memory.cc",
        "src/sockets.cc",
        "src/udp.cc"
      ],
      # Node's defaults add -Wno-unused-parameter and -fno-exceptions; the
      # addon wants the warning, and uses one exception type internally
      # (see PendingJsException in src/js.h). Node's own headers are marked
      # as system headers so that only warnings in this code are reported.
      "cflags!": ["-Wno-unused-parameter"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags": ["-Wall", "-Wextra", "-isystem", "<(node_root_dir)/include/node"],
      "cflags_cc": ["-std=c++17", "-fexceptions"],
      # Never unload the library: Node dlclose()s an addon when the last
      # environment (e.g. a worker) that loaded it goes away, but code in it
      # still runs later: uv_close callbacks, and the SharedArrayBuffer
      # deleter, which V8 may call on any thread whenever it frees a buffer.
      "ldflags": ["-Wl,-z,nodelete"]
    }
  ]
}
