// Small text files written safely: whole or not at all, and every write error reported naming the file
// (a full disk must stop a run, not leave a file cut mid-line).
#pragma once

#include <functional>
#include <string>

namespace dilatron {

// fsync()s a file, or a directory after a rename in it, so the change survives a crash.
void fsync_path(const std::string& path, bool directory);

// The one way files are replaced: write(tmp) writes and fsync()s the temporary tmp, which is then
// renamed over path (and the directory fsync()ed). On any failure tmp is removed, path is left as it
// was, and the error propagates.
void replace_atomically(const std::string& path, const std::string& tmp, const std::function<void()>& write);

// Writes text to path + ".tmp", fsync()s it and renames it over path (then fsync()s the directory).
// On any failure the temporary is removed, path is left as it was, and an Error names the file.
void write_file_atomically(const std::string& path, const std::string& text);

// Appends text to path (created when missing). When not all of it can be written, the file is cut back
// to its old size (no half line stays) and an Error names the file and the cause.
void append_to_file(const std::string& path, const std::string& text);

}  // namespace dilatron
