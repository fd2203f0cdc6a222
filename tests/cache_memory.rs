//! What the operator's watch cache takes per object, against kube-runtime's `Store` with the
//! same objects. A binary of its own: the C allocator's count is shared by every thread, so no
//! other test may allocate beside it.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::runtime::{reflector, watcher};
use opsconductor_operator::controller::cache::cache;
use opsconductor_operator::controller::compact::Compact;
use opsconductor_operator::{build, memory, render};

#[path = "support/measured.rs"]
mod measured;

/// The point of the cache: what it takes per object, measured with the C allocator's count
/// against kube-runtime's `Store` with the same objects (the operator's Deployments of 200
/// stacks). Printed, and checked only to be well under the `Store`'s.
#[test]
fn the_cache_takes_a_fraction_of_a_stores_memory_per_object() {
    // glibc's count (mallinfo2); the operator's images and this machine are glibc.
    assert!(
        memory::heap_in_use().is_some(),
        "no heap count from the C library"
    );
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/opsconductor.yaml"
    ))
    .unwrap();
    let mut objects = Vec::new();
    for i in 0..200 {
        let ns = format!("opsc-bench-{i:03}");
        let bundle = render::bundle_for(
            "opsconductor.yaml",
            &text,
            &ns,
            &build::BuildOptions::default(),
        )
        .unwrap();
        for mut d in bundle.deployments {
            let n = objects.len();
            d.metadata.namespace = Some(ns.clone());
            d.metadata.uid = Some(format!("{n:08x}-1111-2222-3333-444455556666"));
            d.metadata.resource_version = Some(format!("{}", 100_000 + n));
            d.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "opsconductor.io/v1alpha1".into(),
                kind: "OpsConductorStack".into(),
                name: "shop".into(),
                uid: format!("{i:08x}-1111-2222-3333-444455556666"),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]);
            objects.push(serde_json::to_vec(&d).unwrap());
        }
    }
    let decode = |j: &Vec<u8>| serde_json::from_slice::<Compact<Deployment>>(j).unwrap();
    // The smaller of three runs each (the first also fills the kind's dictionary).
    let per_object = |fill: &dyn Fn() -> Box<dyn std::any::Any>| {
        (0..3)
            .map(|_| {
                let before = memory::heap_in_use().unwrap();
                let held = fill();
                let after = memory::heap_in_use().unwrap();
                drop(held);
                after.saturating_sub(before) as usize / objects.len()
            })
            .min()
            .unwrap()
    };
    let ours = per_object(&|| {
        let (cache, mut writer) = cache::<Deployment>();
        writer.apply(watcher::Event::Init);
        for j in &objects {
            writer.apply(watcher::Event::InitApply(decode(j)));
        }
        writer.apply(watcher::Event::InitDone);
        Box::new((cache, writer))
    });
    let store = per_object(&|| {
        let (reader, mut writer) = reflector::store::<Compact<Deployment>>();
        writer.apply_watcher_event(&watcher::Event::Init);
        for j in &objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(decode(j)));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        Box::new((reader, writer))
    });
    measured::measured(format!(
        "{} Deployments: {ours} bytes per object in the operator's cache, {store} in a \
         kube-runtime Store",
        objects.len()
    ));
    assert!(ours * 2 < store, "{ours} against {store} bytes per object");
}
