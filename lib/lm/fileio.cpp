#include "dilatron/fileio.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "dilatron/error.h"

namespace dilatron {
namespace {

// Writes all of text to fd; 0, or the errno of the failed write.
int write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n < 0 ? errno : EIO;
    done += static_cast<size_t>(n);
  }
  return 0;
}

}  // namespace

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  DILATRON_CHECK(fd >= 0, "cannot open '", path, "' to fsync it: ", std::strerror(errno));
  const int status = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  DILATRON_CHECK(status == 0, "cannot fsync '", path, "': ", std::strerror(err));
}

void replace_atomically(const std::string& path, const std::string& tmp, const std::function<void()>& write) {
  try {
    write();
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    DILATRON_CHECK(!ec, "cannot rename '", tmp, "' to '", path, "': ", ec.message());
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw;
  }
  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  fsync_path(dir.empty() ? "." : dir.string(), /*directory=*/true);
}

void write_file_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  replace_atomically(path, tmp, [&] {
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    DILATRON_CHECK(fd >= 0, "cannot create '", tmp, "': ", std::strerror(errno));
    int err = write_all(fd, text);
    if (err == 0 && ::fsync(fd) != 0) err = errno;
    if (::close(fd) != 0 && err == 0) err = errno;
    DILATRON_CHECK(err == 0, "cannot write '", tmp, "': ", std::strerror(err));
  });
}

void append_to_file(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  DILATRON_CHECK(fd >= 0, "cannot open '", path, "' to append to it: ", std::strerror(errno));
  const off_t old_size = ::lseek(fd, 0, SEEK_END);
  int err = write_all(fd, text);
  if (err != 0 && old_size >= 0) {
    [[maybe_unused]] const int cut = ::ftruncate(fd, old_size);  // best effort: a device has no size to go back to
  }
  if (::close(fd) != 0 && err == 0) err = errno;
  DILATRON_CHECK(err == 0, "cannot write '", path, "': ", std::strerror(err));
}

}  // namespace dilatron
