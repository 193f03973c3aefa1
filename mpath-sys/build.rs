//! Generates the raw libmpathpersist bindings from the system's
//! `mpath_persist.h` with bindgen, in dynamic-loading mode: nothing is
//! linked, the library is opened at run time.
//!
//! `MPATH_INCLUDE_DIR` names the directory holding `mpath_persist.h`
//! (default: the usual system include directories). `MPATH_LIB_DIR` names
//! the directory of `libmpathpersist.so.0`; it is recorded for the run-time
//! loader as `MPATH_SYS_DEFAULT_LIB` (default: the library's soname, found
//! by the dynamic loader's usual search).

use std::env;
use std::path::{Path, PathBuf};

const HEADER: &str = "mpath_persist.h";

fn find_header() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=MPATH_INCLUDE_DIR");
    if let Some(dir) = env::var_os("MPATH_INCLUDE_DIR") {
        let p = Path::new(&dir).join(HEADER);
        return p.is_file().then_some(p);
    }
    ["/usr/include", "/usr/local/include"]
        .iter()
        .map(|d| Path::new(d).join(HEADER))
        .find(|p| p.is_file())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MPATH_LIB_DIR");
    let Some(header) = find_header() else {
        panic!(
            "\n\nmpath-sys: {HEADER} not found{}.\n\
             It comes with multipath-tools' development files:\n\
             \x20 Debian/Ubuntu: apt-get install multipath-tools\n\
             \x20 Fedora/RHEL:   dnf install device-mapper-multipath-devel\n\
             or set MPATH_INCLUDE_DIR to the directory that holds it.\n",
            match env::var("MPATH_INCLUDE_DIR") {
                Ok(d) => format!(" in MPATH_INCLUDE_DIR={d}"),
                Err(_) => " in /usr/include or /usr/local/include".to_string(),
            }
        );
    };
    println!("cargo:rerun-if-changed={}", header.display());
    let lib = match env::var("MPATH_LIB_DIR") {
        Ok(dir) => Path::new(&dir)
            .join("libmpathpersist.so.0")
            .display()
            .to_string(),
        Err(_) => "libmpathpersist.so.0".to_string(),
    };
    println!("cargo:rustc-env=MPATH_SYS_DEFAULT_LIB={lib}");

    let bindings = bindgen::Builder::default()
        .header(header.display().to_string())
        .allowlist_function("libmpathpersist_init")
        .allowlist_function("libmpathpersist_exit")
        .allowlist_function("mpath_persistent_reserve_in")
        .allowlist_function("mpath_persistent_reserve_out")
        .allowlist_type("prin_resp")
        .allowlist_type("prin_readdescr")
        .allowlist_type("prin_resvdescr")
        .allowlist_type("prin_capdescr")
        .allowlist_type("prin_fulldescr")
        .allowlist_type("print_fulldescr_list")
        .allowlist_type("prout_param_descriptor")
        .allowlist_type("transportid")
        // The MPATH_* macros. The variable mpath_mx_alloc_len is left out:
        // bindgen's dynamic mode would emit it as a link-time extern.
        .allowlist_var("MPATH_.*")
        .dynamic_library_name("LibMpathPersist")
        .dynamic_link_require_all(true)
        .wrap_unsafe_ops(true)
        .layout_tests(true)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .unwrap_or_else(|e| panic!("mpath-sys: bindgen failed on {}: {e}", header.display()));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("mpath-sys: writing bindings.rs");
}
